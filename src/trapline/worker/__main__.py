"""``python -m trapline.worker``: the same as ``trapline worker`` (for subprocess tests)."""

from trapline.cli.worker_cmd import main

if __name__ == "__main__":
    main()
