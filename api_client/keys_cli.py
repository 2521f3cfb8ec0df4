"""`inpaint keys create|list|revoke` (DESIGN §8): API keys of the HTTP API, straight in the state Redis
(INPAINT_STATE_URL, else INPAINT_BROKER_URL). An operator's command: it needs the Redis, not an API key.

`create` prints the key and its webhook secret once (`key: ...` and `webhook_secret: whsec_...`, or
`{"name", "key", "webhook_secret"}` with --json); Redis keeps only the key's SHA-256.
"""
import argparse
import json

import redis

from api_client import keys
from api_client.client import ClientConfig

__all__ = ["add_keys_command"]


def add_keys_command(commands, common: argparse.ArgumentParser) -> None:
    """Add `keys` and its subcommands to the `inpaint` parser's subcommands."""
    parser = commands.add_parser("keys", help="create, list and revoke API keys of the HTTP API")
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="create a key; prints it and its webhook "
                                "secret once")
    create.add_argument("--name", required=True, help="unique name of the key (its owner, a service)")
    create.add_argument("--queues", help="comma-separated queues the key may submit to (default: INPAINT_QUEUE)")
    create.add_argument("--rate", type=int, default=keys.DEFAULT_RATE,
                        help=f"job submissions per minute, 0 = no limit (default {keys.DEFAULT_RATE})")
    create.add_argument("--max-active", type=int, default=keys.DEFAULT_MAX_ACTIVE,
                        help=f"jobs queued or running at once, 0 = no limit (default {keys.DEFAULT_MAX_ACTIVE})")
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", parents=[common], help="list the keys (never the keys themselves)")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key: it answers 401 from now on")
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(handler=_revoke)


def _redis(config: ClientConfig) -> redis.Redis:
    return redis.Redis.from_url(config.state_url or config.broker_url, decode_responses=True, socket_timeout=10,
                                socket_connect_timeout=10)


def _create(args) -> int:
    config = ClientConfig.from_env()
    queues = [q.strip() for q in (args.queues or config.queue).split(",") if q.strip()]
    with _redis(config) as connection:
        new = keys.create_key(connection, args.name, queues, rate=args.rate, max_active=args.max_active)
    if args.json:
        print(json.dumps({"name": new.name, "key": new.key, "webhook_secret": new.webhook_secret}), flush=True)
    else:
        print(f"key: {new.key}\nwebhook_secret: {new.webhook_secret}", flush=True)
    return 0


def _list(args) -> int:
    with _redis(ClientConfig.from_env()) as connection:
        found = keys.list_keys(connection)
    if args.json:
        print(json.dumps([key.public() for key in found]), flush=True)
        return 0
    for key in found:
        limits = f"rate {key.rate}/min, max active {key.max_active}"
        print(f"{key.name}\t{key.key_id}\tqueues {','.join(key.queues)}\t{limits}", flush=True)
    return 0


def _revoke(args) -> int:
    with _redis(ClientConfig.from_env()) as connection:
        keys.revoke_key(connection, args.name)
    print(json.dumps({"name": args.name, "revoked": True}) if args.json else f"{args.name}: revoked", flush=True)
    return 0
