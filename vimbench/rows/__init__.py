"""Result rows: the one CSV schema (``schema.py``), the append-only writer, the reader that plots and
reports use, and the generic sweep that turns configurations into rows."""
