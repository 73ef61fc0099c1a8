"""Connecting to a dask cluster: a ``LocalCluster`` on this machine, or an existing scheduler."""
from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING, Iterator, Optional, Union

if TYPE_CHECKING:
    import distributed

__all__ = ["get_client", "validate_scheduler_address"]

_ADDRESS = re.compile(r"^(tcp|tls|ucx|inproc|ws|wss)://[^\s/]+(:\d+)?/?$")


def validate_scheduler_address(address: str) -> str:
    """Check the form of a scheduler address ("tcp://host:port"); a bare "host:port" gets "tcp://".

    Raises:
        ValueError: The address is not of the form protocol://host:port.
    """
    address = str(address).strip()
    if "://" not in address:
        address = f"tcp://{address}"
    if not _ADDRESS.match(address):
        raise ValueError(f"Invalid scheduler address {address!r}; expected e.g. 'tcp://10.0.0.5:8786'.")
    return address


def _worker_threads(n_workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(n_workers, 1))


@contextlib.contextmanager
def get_client(scheduler=None, n_workers: Optional[int] = None, timeout: float = 10.0,
               verbose: bool = True) -> Iterator["distributed.Client"]:
    """A dask client for the run, closed (with its cluster, if it started one) at the end.

    Args:
        scheduler: None to start a ``LocalCluster`` on 127.0.0.1, a scheduler address ("tcp://host:port") to
            connect to a running cluster, or a ``distributed.Client`` to use as it is (it is not closed).
        n_workers: Worker processes of the local cluster (default: one per CPU core, at most 4); each runs one
            task at a time, with the cores shared among the workers for torch.
        timeout: Seconds to wait for a scheduler to answer.
        verbose: Print the dashboard link.

    Raises:
        ValueError: The scheduler address is malformed or the scheduler does not answer within ``timeout``.
    """
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler is not None:
        address = validate_scheduler_address(scheduler)
        _probe(address, timeout)
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise ValueError(f"The dask scheduler at {address} does not answer (waited {timeout:g} s): {error}. "
                             "Is it running, and reachable from here?") from None
        cluster = None
    else:
        if n_workers is None:
            n_workers = max(1, min(os.cpu_count() or 1, 4))
        if int(n_workers) < 1:
            raise ValueError(f"n_workers must be at least 1, got {n_workers}.")
        cluster = LocalCluster(
            n_workers=int(n_workers), threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=":0" if _has_bokeh() else None,
            env={"OMP_NUM_THREADS": str(_worker_threads(int(n_workers)))},
        )
        client = Client(cluster)
    try:
        if verbose and "dashboard" in client.scheduler_info().get("services", {}):
            print(f"dask dashboard: {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _probe(address: str, timeout: float) -> None:
    """Fail fast (not after the client's connection timeout) when nothing listens at a tcp address."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme not in ("tcp", "tls") or parts.port is None:
        return
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"The dask scheduler at {address} does not answer: {error}. Is it running, and reachable "
                         "from here?") from None


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def client_or_none(scheduler) -> Union[None, str, "distributed.Client"]:
    """``scheduler`` checked for its form (strings) without connecting."""
    if scheduler is None or not isinstance(scheduler, str):
        return scheduler
    return validate_scheduler_address(scheduler)
