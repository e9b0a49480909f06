"""SA²CRQ: adaptive-length semantic IDs and generative retrieval. See README.md and ../shared/DESIGN.md."""
