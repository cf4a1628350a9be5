from lbproxy.cli import console

console()
