"""Networks, apart from the methods that train them: open_clip backbones behind one interface
(backbone), batched and cached feature extraction (features) and the CLIP4Cir Combiner (combiner)."""
