from castseg.cli import main

raise SystemExit(main())
