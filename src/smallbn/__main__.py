from smallbn.cli import main

raise SystemExit(main())
