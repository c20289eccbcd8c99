"""The chapters' kernels talk to the build over CurveZMQ-encrypted sockets, not plain TCP.

jupyter-book executes each chapter in its own process through nbclient, whose kernel manager provisions no
transport encryption by default (``KernelManager.transport_encryption = "disabled"``); ipykernel then warns, once
per chapter, in the build log that it "is running over TCP without encryption". ipykernel's kernelspec declares
CurveZMQ support and pyzmq here is built with it, so the build asks for it where the kernelspec offers it
("auto"): the warning's cause goes away instead of the warning being hidden. nbclient makes its kernel manager
without any configuration of ours (myst-nb passes none), so the trait's default is set, in this build process only.
"""

from __future__ import annotations

from sphinx.application import Sphinx


def encrypt_kernel_transport() -> bool:
    """Make "auto" the default transport encryption of new kernel managers; False where pyzmq lacks CurveZMQ."""
    import zmq
    from jupyter_client.manager import KernelManager

    if not zmq.has("curve"):
        return False
    KernelManager.transport_encryption.default_value = "auto"
    return True


def setup(app: Sphinx) -> dict:
    encrypt_kernel_transport()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
