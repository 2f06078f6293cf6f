"""Lightning callbacks: online k-NN monitor."""
