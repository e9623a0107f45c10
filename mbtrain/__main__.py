from mbtrain.cli import main

main()
