"""Pieces every slimray package may import: errors, paths and the store opener, the Ray connection,
free ports and the predict client. Nothing here imports another slimray package except ``db`` lazily
(inside :func:`common.paths.open_store`), so the one-way direction of dependencies holds.
"""
