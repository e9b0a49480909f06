"""Reading and writing through fsspec, so local paths, file:// and s3:// all work."""
