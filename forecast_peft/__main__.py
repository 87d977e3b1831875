import sys

from forecast_peft.cli import main

sys.exit(main())
