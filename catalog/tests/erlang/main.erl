-module(main).
-export([main/1]).

main(Args) ->
    Line = io:get_line(""),
    N = list_to_integer(string:trim(Line)),
    io:format("~b~n", [N * 2]),
    lists:foreach(fun(A) -> io:format("~ts~n", [A]) end, Args),
    io:format(standard_error, "conformance-stderr~n", []),
    halt(3).
