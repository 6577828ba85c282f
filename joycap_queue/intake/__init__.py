"""How images become jobs: finding and opening files, the one enqueue path, watch folders, datasets."""
