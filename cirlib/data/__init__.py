"""Data as the papers use it: loaders for the public FashionIQ, CIRR and CIRCO layouts (datasets),
image preprocessing (preprocess) and its decoded-pixel cache (pixels), dataset statistics (stats),
Fashion-MNIST (fashion_mnist), the embedded benchmarks' entry point (benchmarks) and their
generators (:mod:`cirlib.data.synth`)."""
