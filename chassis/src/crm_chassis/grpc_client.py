"""Client channels for calling a service: keepalive, round-robin over a headless Service's
pods, and OpenTelemetry client spans that carry the trace into the callee."""

from __future__ import annotations

import grpc


def make_channel(target: str) -> grpc.Channel:
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.keepalive_time_ms", 30000),
            ("grpc.keepalive_timeout_ms", 10000),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", 65 * 1024 * 1024),
            # A callee that restarts (a rollout, a crash) is reconnected within seconds, not
            # after gRPC's default back-off of up to two minutes.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ],
    )
    try:
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
    except ImportError:  # pragma: no cover
        return channel
    return intercept_channel(channel, client_interceptor())
