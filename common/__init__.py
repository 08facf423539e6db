"""Pieces every slimray package may import: errors, paths and the store opener, the Ray connection, free ports,
the predict client, the config base and the trial-config models (workers build students from them, the search
space reads its bounds from them, the job spec nests them). Nothing here imports another slimray package except
``db`` lazily (inside :func:`common.paths.open_store`), so the one-way direction of dependencies holds.
"""
