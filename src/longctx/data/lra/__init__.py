"""Long Range Arena (Tay et al. 2020): generators and loaders of its tasks as integer token sequences.

listops.py and pathfinder.py generate their data (seeded, cached under the data root); the Text,
Retrieval and Image tasks load the published files. Every task gives the batches of
``longctx.tasks.classify`` through ``common.TokenClassifyDataModule``.
"""
