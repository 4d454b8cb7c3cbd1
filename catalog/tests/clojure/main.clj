(let [n (Long/parseLong (clojure.string/trim (read-line)))]
  (println (* 2 n))
  (doseq [a *command-line-args*] (println a))
  (binding [*out* *err*] (println "conformance-stderr"))
  (flush)
  (System/exit 3))
