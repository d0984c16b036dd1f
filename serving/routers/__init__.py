"""The query handler's routes, one router per concern; ``serving.app`` includes them all."""
