"""Chapter ``inside-trace-elbo``: the installed source of Trace_ELBO, read against BBVI eq. (1). (Being written.)"""

CHAPTER = "inside-trace-elbo"
