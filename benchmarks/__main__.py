"""``python -m benchmarks``: run every benchmark and regenerate RESULTS.md and the charts."""

from benchmarks.run import main

raise SystemExit(main())
