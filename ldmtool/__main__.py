from ldmtool.cli.app import main

main()
