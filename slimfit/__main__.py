from slimfit.cli import main

raise SystemExit(main())
