"""Numbers derived from result rows: power-law exponents and crossovers (``fit.py``), and the Vim
paper's claims (``paper.py``) checked against them (``claims.py``)."""
