"""Pure loss functions of tensors, testable without Lightning or models."""
