"""`python -m bench`: every figure on one throwaway stack (see bench/orders.py)."""

from bench.orders import main

raise SystemExit(main())
