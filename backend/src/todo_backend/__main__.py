"""Run the ``todo-db`` tool as ``python -m todo_backend``."""

from todo_backend.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
