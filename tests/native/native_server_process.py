"""Run a native-protocol server over an in-memory broker on 127.0.0.1 (ephemeral port) for SDK end-to-end tests.

Prints the listening port on its first stdout line, then serves until killed or until stdin closes (so it never
outlives the test process that started it).
"""

from __future__ import annotations

import sys

from twisted.internet import reactor, stdio
from twisted.internet.protocol import Protocol

from tidegate.adapters.native.server import NativeServerFactory, NativeSettings
from tidegate.core.security.gate import AllowAllGate
from tidegate.core.testing import make_broker


class StopWhenParentGoes(Protocol):
    def connectionLost(self, reason: object = None) -> None:
        if reactor.running:
            reactor.stop()


def main() -> None:
    heartbeat_s = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    broker = make_broker(reactor)
    port = reactor.listenTCP(0, NativeServerFactory(broker, AllowAllGate(), reactor,
                                                        NativeSettings(heartbeat_s=heartbeat_s)),
                             interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    stdio.StandardIO(StopWhenParentGoes())
    reactor.run()


if __name__ == "__main__":
    main()
