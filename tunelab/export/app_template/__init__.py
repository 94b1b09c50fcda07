"""The exported Space's own files: `export-app` copies app.py as it is (it imports nothing from tunelab)."""
