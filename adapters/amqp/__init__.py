"""AMQP 0-9-1 adapter: the sans-IO codec (`codec`), built on pamqp's method table, for the future RabbitMQ-compatible
listener."""
