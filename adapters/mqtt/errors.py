"""Core refusals as MQTT reason codes: the one table the adapter uses, by exception class.

Each code is valid in the packets its error can answer (PUBACK/PUBREC/SUBACK for data-plane refusals, CONNACK
for NotAuthenticated). The most specific class of the error's MRO that the table names wins; anything else is 0x83
Implementation specific error. 3.1.1 has no codes for most of these: the adapter closes the connection (PUBLISH),
answers 0x80 (SUBACK) or maps to a CONNACK return code (codec `connack_return_code`).
"""

from __future__ import annotations

from tidegate.core.errors import (
    InvalidName,
    MessageTooLarge,
    NoPermission,
    NotAuthenticated,
    NotAuthorized,
    QuotaExceeded,
    SchemaViolation,
    StoreFull,
    TidegateError,
    TopicNotFound,
)

from .reason_codes import ReasonCode

REASON_FOR_CORE_ERROR: dict[type[TidegateError], ReasonCode] = {
    NotAuthorized: ReasonCode.NOT_AUTHORIZED,
    NoPermission: ReasonCode.NOT_AUTHORIZED,  # a topic without write permission
    NotAuthenticated: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    InvalidName: ReasonCode.TOPIC_NAME_INVALID,
    TopicNotFound: ReasonCode.TOPIC_NAME_INVALID,  # auto-creation is off and the topic does not exist
    MessageTooLarge: ReasonCode.QUOTA_EXCEEDED,
    StoreFull: ReasonCode.QUOTA_EXCEEDED,
    QuotaExceeded: ReasonCode.QUOTA_EXCEEDED,  # limits against abuse (CONNACK, PUBACK/PUBREC, SUBACK)
    SchemaViolation: ReasonCode.PAYLOAD_FORMAT_INVALID,  # the topic's JSON Schema or content-type rule
}


def reason_for_core_error(error: BaseException, default: ReasonCode = ReasonCode.IMPLEMENTATION_SPECIFIC_ERROR
                          ) -> ReasonCode:
    """The reason code reporting `error` to an MQTT client."""
    for cls in type(error).__mro__:
        reason = REASON_FOR_CORE_ERROR.get(cls)  # type: ignore[call-overload]
        if reason is not None:
            return reason
    return default
