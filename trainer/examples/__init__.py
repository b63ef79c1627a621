"""Demo tasks and the end-to-end demo (make_tasks.py, demo.py)."""
