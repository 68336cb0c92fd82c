"""The cache format and its life cycle: encodings of teacher outputs, the Zarr store, writing, the
writer lock, checksummed files, sharing (pull, export, merge), inspect and verify."""
