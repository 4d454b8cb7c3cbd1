:- use_module(library(main)).
:- initialization(main, main).

main(Argv) :-
    read_line_to_string(user_input, Line),
    number_string(N, Line),
    M is N * 2,
    format("~d~n", [M]),
    forall(member(A, Argv), format("~w~n", [A])),
    format(user_error, "conformance-stderr~n", []),
    halt(3).
