"""Pictures of what a backbone learned: attention maps, retrieval, embeddings (notebooks, callbacks)."""
