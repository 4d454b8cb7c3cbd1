import System.Environment (getArgs)
import System.Exit (exitWith, ExitCode(..))
import System.IO (hPutStrLn, stderr)

main :: IO ()
main = do
  n <- readLn :: IO Integer
  print (n * 2)
  args <- getArgs
  mapM_ putStrLn args
  hPutStrLn stderr "conformance-stderr"
  exitWith (ExitFailure 3)
