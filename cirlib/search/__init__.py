"""First-stage retrieval at scale: top-k cosine search over large galleries, exact or with FAISS
(index: one interface, an exact chunked search and FAISS IVF / HNSW indexes, and their config)."""
