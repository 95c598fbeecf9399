"""Presenting results read from CSVs only: terminal and Markdown tables, paper-style figures, the report."""
