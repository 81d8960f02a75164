import sys

from accord import verbosity
from accord.shutdown import end_process

argv, verbose = verbosity.take_flag(sys.argv[1:])
verbosity.configure(verbose or None)  # before DeepSpeed is imported

from accord.train.main import main  # noqa: E402

end_process(main(argv))
