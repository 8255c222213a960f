"""cirlib: the library behind the Composed Image Retrieval course notebooks.

Each module holds one piece of the pipeline (data generation, loaders, metrics, backbone,
fine-tuning, Combiner, ...); the notebooks in ``notebooks/`` call into them.
"""

__version__ = "0.1.0"
