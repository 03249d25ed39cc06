"""Training data: the image folder with its captions (folder.py) and the encoding cache (encoding.py)."""
