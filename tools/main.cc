// The kvrelay CLI. All logic lives in kvrelay_cli (tools/cli/).
#include <iostream>

#include "tools/cli/cli.h"

int main(int argc, char** argv) { return kvrelay::cli::RunCli(argc, argv, std::cout, std::cerr); }
