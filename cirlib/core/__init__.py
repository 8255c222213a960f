"""What every stage shares: atomic files and fingerprints (io), folders (paths), device and mixed
precision (device), caches (cache), the training loop (training) and its multi-process layer
(distributed), small tensor idioms (tensors), and the artifacts notebooks hand to each other."""
