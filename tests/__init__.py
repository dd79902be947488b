"""Test suite: real Postgres, real RabbitMQ, the simulator as the vendor."""
