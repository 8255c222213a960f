"""Generators of the embedded benchmarks, written in the real datasets' exact layouts: shared
rendering (render), the FashionIQ-format ``fashion`` benchmark (fashion), the CIRR/CIRCO-format
``scenes`` benchmark (scenes) and the metadata file every generated root carries (meta)."""
