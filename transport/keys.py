"""Generate a CURVE key pair for a cluster's tcp endpoints.

    python -m infinillm.transport.keys DIR [--name NAME] [--force]

writes ``DIR/NAME.key`` (public: give it to peers) and ``DIR/NAME.key_secret`` (mode 0600:
keep it), and prints the ``TransportConfig`` options that use them. A cluster may share one
pair (copy the secret file to every host) or give each process its own.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import TransportError
from .auth import generate_keypair

__all__ = ["main"]


def main(argv: list[str] | None = None, prog: str = "python -m infinillm.transport.keys") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate a ZeroMQ CURVE key pair for infinillm's tcp endpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("directory", help="where to write NAME.key and NAME.key_secret (created if missing)")
    parser.add_argument("--name", default="infinillm", help="file name stem")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        public_path, secret_path = generate_keypair(args.directory, args.name, overwrite=args.force)
    except (TransportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"public key: {public_path}")
    print(f"secret key: {secret_path} (mode 0600; do not share)")
    print("use with:")
    print(f"  curve_secret_key_file={str(secret_path)!r}, curve_public_key_file={str(public_path)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
