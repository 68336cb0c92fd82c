"""`python -m cskd_cache ...` (what torchrun runs) is the same as the `cskd-cache` command."""

from cskd_cache_cli.app import main

if __name__ == "__main__":
    main()
