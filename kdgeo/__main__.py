from kdgeo.cli import main

main()
