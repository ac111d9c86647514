"""Soft (channel) and hard (connection) errors the AMQP adapter raises while handling a method.

Both carry RabbitMQ's reply code and text (`"NOT_FOUND - no queue 'q' in vhost '/'"`); the connection turns them into
`channel.close` or `connection.close` with the class and method ids of the method that failed.
"""

from __future__ import annotations

from tidegate.adapters.amqp.reply_codes import ReplyCode

VHOST = "/"


class AmqpError(Exception):
    def __init__(self, code: ReplyCode, text: str) -> None:
        super().__init__(text)
        self.code = ReplyCode(code)
        # RabbitMQ spells the code name before the explanation: "NOT_FOUND - no queue 'q' in vhost '/'"
        self.text = f"{self.code.name} - {text}"


class ChannelError(AmqpError):
    """Closes the channel (channel.close); the connection and its other channels carry on."""


class ConnectionError_(AmqpError):  # noqa: N801 - the builtin ConnectionError is an OSError
    """Closes the whole connection (connection.close)."""


def not_found(kind: str, name: str) -> ChannelError:
    return ChannelError(ReplyCode.NOT_FOUND, f"no {kind} '{name}' in vhost '{VHOST}'")


def locked(queue: str) -> ChannelError:
    return ChannelError(ReplyCode.RESOURCE_LOCKED,
                        f"cannot obtain exclusive access to locked queue '{queue}' in vhost '{VHOST}'. It could be "
                        "originally declared on another connection or the exclusive property value does not match "
                        "that of the original declaration.")


def inequivalent(argument: str, kind: str, name: str, received: object, current: object) -> ChannelError:
    return ChannelError(ReplyCode.PRECONDITION_FAILED,
                        f"inequivalent arg '{argument}' for {kind} '{name}' in vhost '{VHOST}': received "
                        f"{_show(received)} but current is {_show(current)}")


def _show(value: object) -> str:
    if isinstance(value, bool):
        return f"'{str(value).lower()}'"
    if value is None:
        return "none"
    return f"'{value}'"
