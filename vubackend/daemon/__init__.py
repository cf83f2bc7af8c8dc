"""vubackend.daemon: the top of the backend stack.

* :class:`VhostUserBackend`: what a device implements (thread-safe devices);
  :class:`VhostUserBackendMut`: the same API, every hook serialised by the
  daemon.
* :class:`VhostUserDaemon`: serves a device on a socket (``serve``,
  ``start``, ``start_client``, ``wait``, ``shutdown``), one fresh session per
  connection, with worker threads on epoll.
* :class:`VringEpollHandler`: one worker (``get_epoll_handlers()``), to add
  your own fds with ``register_listener``.
* :class:`BackendChannel`: back-end requests to the front-end
  (config change, in-band calls, shared objects, SHMEM maps).
* :class:`InflightBuffer`: the inflight I/O tracking buffer.
"""

from vubackend.daemon._backend import VhostUserBackend, VhostUserBackendMut
from vubackend.daemon._channel import BackendChannel
from vubackend.daemon._daemon import VhostUserDaemon
from vubackend.daemon._inflight import InflightBuffer
from vubackend.daemon._worker import VringEpollHandler

__all__ = [
    "BackendChannel",
    "InflightBuffer",
    "VhostUserBackend",
    "VhostUserBackendMut",
    "VhostUserDaemon",
    "VringEpollHandler",
]
