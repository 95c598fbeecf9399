"""Result rows: the one CSV schema (``schema.py``), the append-only writer, the reader that plots and
reports use, the generic sweep that turns configurations into rows, and the scaling row (``scaling.py``: the
measured forward with its counted FLOPs and predicted memory)."""
