"""`python -m server`: the OpenMP defaults first (torch reads them once, when imported), then the server."""
from server.config import set_thread_env

set_thread_env()

from server.main import main  # noqa: E402  (imports torch, after set_thread_env)

main()
